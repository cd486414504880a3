# The README's first table: the built-in run over seeds, in English and Chinese, without the temporal
# transformer (the frame-level floor: the task needs frame order), and at half and twice the batch.
# $ python study.py config/study_synthetic.py          (25 runs, two at a time: about 20 minutes on 2 cores)
out_dir = "out-study-synthetic"
rows = {
    "english": "",  # python train.py
    "frame-level": "--use_temp=False",
    "chinese": "config/synthetic_zh.py",
    "batch 16": "--batch_size=16",
    "batch 64": "--batch_size=64",
}
seeds = (1337, 3, 4, 5, 6)  # the default seed and four that no setting was tuned on
