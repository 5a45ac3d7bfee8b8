"""Scale-out on Ray: engine replicas (Ray actors) behind the OpenAI server, with prefix/load/session
routing, failover that resumes every in-flight request, live migration and runtime drain/add.

Ray is optional (`pip install mixserve[ray]`) and imported only when a cluster starts.
"""

from mixserve.cluster.config import ClusterConfig

__all__ = ["ClusterConfig"]
