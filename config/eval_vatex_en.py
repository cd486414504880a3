# Evaluate on VATEX with its English captions: 1,500 test videos x 10 captions. T2V ranks each caption among the
# videos; V2T scores each video's caption group by its best caption.
# $ python eval.py config/eval_vatex_en.py --init_from=out-finetune-vatex-en/ckpt.pt
# One prepared folder (data/vatex) holds both languages: `captions` (English) and `captions_zh`.
dataset = "vatex"
split = "test"
caption_field = "captions"
