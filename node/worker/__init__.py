"""The worker: the node's side of printing, from a granted copy to a finish report, and its printer drivers."""
