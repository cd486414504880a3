# After config/study_synthetic.py: the English run at half and twice the batch, the same epochs (so twice and half
# the steps), beside the default; its runs at the seeds below are the first table's, reused.
name = "batch"
rows = {
    "english": "",
    "batch 16": "--batch_size=16",
    "batch 64": "--batch_size=64",
}
seeds = (1337, 3, 4)
