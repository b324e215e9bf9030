class StreamError(RuntimeError):
    """A transfer failed or timed out; the message says which one and why. It was not completed."""
