"""Checks of the deployment artefacts: images, Kubernetes manifests, alert rules and dashboards."""
