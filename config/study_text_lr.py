# After config/study_synthetic.py: the CLIP text tower from scratch at the video towers' learning rate (1e-3) and in
# between, beside the default text_lr=1e-4, at three of the first table's seeds (its English runs are reused).
# $ python study.py config/study_synthetic.py config/study_text_lr.py
out_dir = "out-study-synthetic"
name = "text_lr"
rows = {
    "english": "",
    "text_lr 3e-4": "--text_lr=3e-4",
    "text_lr 1e-3": "--text_lr=1e-3",
}
seeds = (1337, 3, 4)
