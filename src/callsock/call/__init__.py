"""One call as an application sees it: the session, the handlers, outbound audio, the App."""
