FROM python:3.11-slim
# The server image carries no torch: agents run in the training jobs.
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY monitor_agent monitor_agent
COPY server server
COPY dashboard dashboard
RUN pip install --no-cache-dir -c constraints.txt .
EXPOSE 8765
CMD ["channelscope", "serve", "--host", "0.0.0.0", "--port", "8765"]
