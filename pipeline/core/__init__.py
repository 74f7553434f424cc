"""What every part of tuneline stands on: params.yaml (config, its only reader), the error classes
that set exit codes, progress output, where a base model comes from (model_source), and the DVC
remote check. May import nothing else of the project."""
