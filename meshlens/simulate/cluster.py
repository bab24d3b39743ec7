"""The Kubernetes side of the simulation: nodes, pods, IPs and ReplicaSets over time.

Pod names follow the Deployment controller (``<deployment>-<pod-template-hash>-<5 chars>``, both drawn
from Kubernetes' ``SafeEncodeString`` alphabet); a Deployment change starts a new ReplicaSet (new hash,
new pods, new IPs) and retires the old pods one by one, a ``rollout undo`` brings the previous hash back,
and a scale changes the pod count. Calls pick among the pods alive at that instant, so a rollout is
visible in the logs exactly as in a real cluster.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from meshlens.simulate.render import ISTIO_JSON_KEYS, logcli_labels_prefix
from meshlens.simulate.topology import GATEWAY, GATEWAY_NS, Topology

_SAFE = "bcdfghjklmnpqrstvwxz2456789"  # k8s.io/apimachinery/pkg/util/rand SafeEncodeString alphabet


def rs_hash(rng: random.Random) -> str:
    return "".join(rng.choice(_SAFE) for _ in range(rng.choice([9, 10, 10])))


def pod_suffix(rng: random.Random) -> str:
    return "".join(rng.choice(_SAFE) for _ in range(5))


@dataclass(eq=False)
class Pod:
    """One pod with its sidecar; ``end_us`` None = still running at the end of the window."""

    name: str
    deployment: str
    namespace: str
    ip: str
    node: int
    rs: str
    image: str
    start_us: int
    end_us: int | None = None
    container: str = "istio-proxy"
    json_keys: tuple[str, ...] = ISTIO_JSON_KEYS
    labels_prefix: str = ""
    new_in_window: bool = False

    def alive(self, t_us: int) -> bool:
        return self.start_us <= t_us and (self.end_us is None or t_us < self.end_us)

    @property
    def node_ip(self) -> str:
        return f"10.244.{self.node}.1"


@dataclass
class Deployment:
    name: str
    namespace: str
    replicas: int
    image_repo: str
    version: str
    mesh: str
    pods: list[Pod] = field(default_factory=list)
    rs_history: list[tuple[str, str]] = field(default_factory=list)  # (hash, version) per revision
    revision: int = 1

    @property
    def current_rs(self) -> str:
        return self.rs_history[-1][0]

    def alive(self, t_us: int) -> list[Pod]:
        return [p for p in self.pods if p.alive(t_us)]


class Cluster:
    """Pods and addresses of every workload, including the ingress gateway."""

    N_NODES = 6

    def __init__(self, topo: Topology, seed: int, window_start_us: int) -> None:
        self.topo = topo
        self.rng = random.Random(f"{seed}:cluster")
        self._next_host = [self.rng.randint(4, 40) for _ in range(self.N_NODES)]
        self.window_start_us = window_start_us
        self.deployments: dict[str, Deployment] = {}
        self.cluster_ips: dict[str, str] = {}
        used_ips: set[str] = set()
        for name in [GATEWAY, *sorted(topo.services)]:
            while True:
                ip = f"10.96.{self.rng.randint(0, 255)}.{self.rng.randint(2, 254)}"
                if ip not in used_ips:
                    used_ips.add(ip)
                    self.cluster_ips[name] = ip
                    break
        gw = Deployment(GATEWAY, GATEWAY_NS, 2, "docker.io/istio/proxyv2", "1.24.2", "istio")
        self.deployments[GATEWAY] = gw
        for name in sorted(topo.services):
            svc = topo.services[name]
            self.deployments[name] = Deployment(name, svc.namespace, svc.replicas, svc.image_repo,
                                                svc.version, topo.mesh_of(name))
        for dep in self.deployments.values():
            h = rs_hash(self.rng)
            dep.rs_history.append((h, dep.version))
            dep.revision = self.rng.randint(3, 40)
            for _ in range(dep.replicas):
                age = self.rng.randint(3600, 30 * 86400) * 1_000_000
                self._new_pod(dep, h, dep.version, window_start_us - age, new=False)

    # ---- addresses ----
    def _new_ip(self, node: int) -> str:
        self._next_host[node] += self.rng.randint(1, 3)
        if self._next_host[node] > 250:
            self._next_host[node] = 4
        return f"10.244.{node}.{self._next_host[node]}"

    def _new_pod(self, dep: Deployment, rs: str, version: str, start_us: int, new: bool) -> Pod:
        node = self.rng.randrange(self.N_NODES)
        container = "linkerd-proxy" if dep.mesh == "linkerd" else "istio-proxy"
        keys = list(ISTIO_JSON_KEYS)
        self.rng.shuffle(keys)
        name = f"{dep.name}-{rs}-{pod_suffix(self.rng)}"
        pod = Pod(name=name, deployment=dep.name, namespace=dep.namespace, ip=self._new_ip(node), node=node,
                  rs=rs, image=f"{dep.image_repo}:{version}", start_us=start_us, container=container,
                  json_keys=tuple(keys), new_in_window=new)
        pod.labels_prefix = logcli_labels_prefix(
            {"namespace": dep.namespace, "pod": name, "container": container, "app": dep.name})
        dep.pods.append(pod)
        return pod

    def pods_of(self, name: str, t_us: int) -> list[Pod]:
        return self.deployments[name].alive(t_us)

    def all_pods(self) -> list[Pod]:
        return [p for d in self.deployments.values() for p in d.pods]

    # ---- lifecycle changes driven by config changes ----
    def rollout(self, name: str, first_ready_us: int, version: str, reuse_rs: str | None = None) -> str:
        """Replace every running pod by pods of a new (or, for an undo, the previous) ReplicaSet.

        New pods become ready one by one ``15-25 s`` apart from ``first_ready_us``; each old pod
        terminates two seconds after its replacement is ready (maxUnavailable 0, maxSurge 1).
        Returns the new ReplicaSet hash.
        """
        dep = self.deployments[name]
        rs = reuse_rs or rs_hash(self.rng)
        dep.rs_history.append((rs, version))
        dep.revision += 1
        old = [p for p in dep.pods if p.end_us is None or p.end_us > first_ready_us]
        t = first_ready_us
        for i in range(dep.replicas):
            self._new_pod(dep, rs, version, t, new=True)
            if i < len(old):
                old[i].end_us = t + 2_000_000
            t += self.rng.randint(15, 25) * 1_000_000
        for p in old[dep.replicas:]:
            p.end_us = t
        return rs

    def scale(self, name: str, at_us: int, replicas: int) -> None:
        dep = self.deployments[name]
        alive = dep.alive(at_us)
        if replicas > len(alive):
            rs = dep.current_rs
            version = dep.rs_history[-1][1]
            for i in range(replicas - len(alive)):
                self._new_pod(dep, rs, version, at_us + (8 + 3 * i) * 1_000_000, new=True)
        else:
            for p in alive[replicas:]:
                p.end_us = at_us + 1_000_000
        dep.replicas = replicas
