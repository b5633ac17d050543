

SOCKET_ENV = "SIDUS_SOCKET"       # here, not in messages.py: sidus-image reads it without msgspec
