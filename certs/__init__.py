"""TLS material for the webhook: CA, serving certificate, rotation, caBundle."""
