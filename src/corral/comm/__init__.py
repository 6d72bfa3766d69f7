"""How bytes move: the driver–worker control channel (ZeroMQ data transport comes next)."""
