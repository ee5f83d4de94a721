"""Echo servers written the way other projects write them, to measure callsock against."""
