"""channelscope's Dash front end; it talks to the server's HTTP API only."""
