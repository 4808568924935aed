"""gRPC servicers: thin translation between messages and the node's operations."""
