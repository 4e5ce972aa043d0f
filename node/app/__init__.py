"""The node as a program: the agent that composes every part (the one composition root), the `netq` command,
the farm client it uses, configuration files and pairing."""
