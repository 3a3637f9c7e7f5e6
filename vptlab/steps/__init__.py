"""The steps: each reads run folders and writes one (train, attack, defend, detect, study), and
`resolve`, which checks a config against the registries before any folder is written."""
