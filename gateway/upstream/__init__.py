"""The way out: targets made ready to serve (URL base, provider, credential, transport), the one
``Transport.send`` seam to upstream HTTP, and the building of upstream URLs from client paths."""
