"""Sans-IO wire codecs shared by the stream server and the client: bytes in, events out.

Nothing here imports asyncio, sockets, the server or the client."""
