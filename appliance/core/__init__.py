"""The Spaces core: front matter, sources, builds, the Space service, actions, jobs, bundles."""
