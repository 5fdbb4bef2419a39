"""Running raykd on Ray clusters: a local multi-node launcher, KubeRay and cluster-launcher configs."""
