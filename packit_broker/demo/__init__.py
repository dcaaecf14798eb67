"""`packit-broker demo`: the whole cut-over on the local stand-in of production."""
