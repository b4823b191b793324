"""One module per pipeline stage; each name is the same in dvc.yaml, here, in Prefect and in MLflow."""
