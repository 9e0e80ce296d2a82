"""mlflow-monitoring: bridge an MLflow tracking server to Prometheus and Pramathus."""

__version__ = "0.1.0"
