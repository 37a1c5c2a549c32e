"""dmr's runners on a Ray cluster (docs/cluster.md).

The head's `dmr serve --ray-address ADDR` stays the one endpoint. Its scheduler
sees each live Ray node as a device with the node's declared `memory`, and places
a runner on the node it chooses through a Ray actor there (`node.NodeRunner`),
which gets the model into the node's store, verifies its digests, starts the same
runner process as on one machine and forwards a TCP port to it. Ray itself runs in
a child process of the server (`bridge`), so a cluster that hangs or dies never
takes the server with it.
"""
