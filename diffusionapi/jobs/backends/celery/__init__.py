"""Scale-out: the Celery + Redis job backend, its workers and the cluster view (README "Several GPUs and machines")."""
