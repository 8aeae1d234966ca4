"""A head and a worker node on this machine, both on 127.0.0.1 (used by local_cluster.sh).

`ray start` cannot put a second node of a loopback cluster on the same machine (joining
resolves 127.0.0.1 to the machine's address, and Ray's loopback mode refuses to join), so
the nodes are started with Ray's own multi-node-on-one-machine helper,
``ray.cluster_utils.Cluster``, and this process stays up to hold them. It writes
``DIR/cluster.ready`` (the GCS and dashboard addresses) once both nodes are up, and stops
the nodes on SIGTERM/SIGINT.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_ports() -> dict:
    """Every per-node port, so the two nodes (and other Ray instances here) never collide."""
    return dict(dashboard_agent_listen_port=free_port(), metrics_agent_port=free_port(),
                metrics_export_port=free_port(), runtime_env_agent_port=free_port(),
                node_manager_port=free_port(), object_manager_port=free_port())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", required=True)
    p.add_argument("--head-cpus", type=int, default=1)
    p.add_argument("--worker-cpus", type=int, default=1)
    p.add_argument("--dashboard-port", type=int, default=8265)
    args = p.parse_args()

    os.environ["RAY_TMPDIR"] = args.dir  # Ray's session files and sockets (a short path)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every address on loopback; read at import
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, shutdown_at_exit=True, head_node_args=dict(
        num_cpus=args.head_cpus, resources={"local_head": 1}, node_ip_address="127.0.0.1",
        include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=args.dashboard_port,
        ray_client_server_port=free_port(), **node_ports()))
    cluster.add_node(num_cpus=args.worker_cpus, resources={"local_worker": 1}, node_ip_address="127.0.0.1",
                     **node_ports())
    cluster.wait_for_nodes()
    ready = {"gcs": cluster.address, "dashboard": f"http://127.0.0.1:{args.dashboard_port}",
             "nodes": len(cluster.list_all_nodes())}
    tmp = os.path.join(args.dir, "cluster.ready.tmp")
    with open(tmp, "w") as f:
        json.dump(ready, f)
    os.replace(tmp, os.path.join(args.dir, "cluster.ready"))

    def stop(*_):
        cluster.shutdown()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    del ray
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
