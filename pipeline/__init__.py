"""tess pipeline: S3 access (the only boto3 user), the fetch stage, the datasets, the VAE and its training."""
