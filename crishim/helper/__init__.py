"""`crishim helper`: the wire protocol (protocol.py, imported by the helper runtime plugin)
and the privileged agent that answers it (agent.py)."""
