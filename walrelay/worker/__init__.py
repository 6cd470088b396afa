"""Worker-side fixes that ``Relay(app)`` gives the app's workers: a consumer that
reconnects fast, heals when stuck and survives a lost Redis."""
