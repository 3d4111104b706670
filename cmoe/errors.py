"""User-facing errors: the CLI prints their message as one line and exits non-zero."""


class CmoeError(Exception):
    """A problem with the user's input or environment, explained in one line."""


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What the hub client raises when the hub cannot answer: OSError (its HTTP errors, offline mode, a
    missing token) and its HTTP library's transport errors (a refused connection, a timeout), which are not
    OSErrors; the library is whichever the client is built on, found through the client's own HTTP error."""
    from huggingface_hub.errors import HfHubHTTPError

    transport = [base for base in HfHubHTTPError.__mro__[1:] if base.__name__ == "HTTPError"]
    return (OSError, *transport)


HUB_ERRORS = _hub_errors()
