"""Containers: the domain model (:mod:`.model`), who a container runs as (:mod:`.users`),
the runtime's defaults (:mod:`.defaults`) and the OCI runtime spec of a container
(:mod:`.spec`), from its CRI ContainerConfig, its image's config and its pod sandbox."""
