"""The fence around sandboxed processes: bubblewrap, the Unix-socket bridges, the egress proxy and the
canaries. It may import app.config, app.logger, app.models and app.errors only.
"""
