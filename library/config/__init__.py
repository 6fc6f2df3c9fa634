"""Configuration: option groups (``options``), ``--config_file`` (``config_file``), dataset TOML
schema (``dataset_schema``) and its resolution into per-dataset parameters (``dataset_blueprint``)."""
