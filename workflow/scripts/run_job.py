# Every rule calls this one script: it hands Snakemake's job description to the semvlp package.
from semvlp.jobs import run_job

run_job(snakemake)  # noqa: F821 (injected by Snakemake's script directive)
