# vrlab: `make help` lists the targets. `make demo` and `make test` install first when needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
VRLAB := $(BIN)/vrlab
# Everything the demo and the tests touch is local: fail at once instead of retrying the hub.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_EVALUATE_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 \
	HF_UPDATE_DOWNLOAD_COUNTS=0 HF_HUB_DISABLE_TELEMETRY=1 WANDB_MODE=disabled
DEMO_ROOT ?= demo
DEMO_ENCODERS ?= tiny/clip,tiny/siglip,tiny/dinov2,tiny/dinov2-reg,tiny/eva02-timm,tiny/eva02-clip,tiny/sd,tiny/sdxl,tiny/sd-image-variations,tiny/dit,tiny/sd3,tiny/clip.tiny/dinov2,tiny/clip.tiny/sd
# the demo's BLIP-2-style adapter: BLIP-2's Q-Former, small enough for a CPU
BLIP2_ADAPTER = adapter=qformer adapter.hidden=64 adapter.layers=2 adapter.heads=4 adapter.num_queries=8
DEMO_ARGS = registry.encoder_dirs=[$(DEMO_ROOT)/encoders] paths.data=$(DEMO_ROOT)/data demo.root=$(DEMO_ROOT)
PERF_ENCODERS ?= random/vit-s16,tiny/clip,tiny/sd
LAW_DEMO_ENCODERS ?= tiny/clip,tiny/siglip,tiny/dinov2,tiny/dinov2-reg,tiny/eva02-timm,tiny/sd,tiny/sdxl,tiny/sd-image-variations,tiny/sd3
# The law paper's 13 representations (law.md §1); CLIP336+DINOv2 runs DINOv2 at 336 px.
LAW_ENCODERS ?= clip336,clip224,openclip-l,dinov2-l,siglip-b,sdim,sd1.5,sd2.1,sdxl,dit,sd3,clip224.dinov2-l,clip336.dinov2-l-336
ADAPTERS ?= checkpoints/stage1
# extra overrides of every sweep of law-ac and law-paper, e.g. SWEEP="hydra/launcher=slurm hydra.launcher.partition=gpu"
SWEEP ?=
ENCODERS ?= $(LAW_ENCODERS)
# stage 1 also for the two A references (CLIP-224 and CLIP-336), once each
PAPER_TRAIN = $(shell echo $(ENCODERS),clip224,clip336 | tr ',' '\n' | awk '!seen[$$0]++' | paste -sd, -)
TABLE ?= outputs/law/table.csv
# two workers on two cores (one thread each); PYTEST_WORKERS=0 runs in one process
PYTEST_WORKERS ?= 2
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install test test-fast lint format demo science perf resolution-demo resolution-study proxies-demo proxy-leaderboard law-ac law-paper law-fit lmvr-aggregation lmvr-components lmvr-domain-shift lmvr-robustness lmvr-tables report browser clean

help: ## show the targets
	@grep -E '^[a-zA-Z0-9_.-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv and install vrlab with its dev extras (does nothing when up to date)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@# imagecorruptions-imaug's metadata pulls the GUI opencv next to the headless one; its real needs
	@# (numba, scikit-image, opencv-python-headless) are in pyproject.toml.
	$(BIN)/python -m pip install --quiet --no-deps 'imagecorruptions-imaug>=1.1.5'
	@# lmms-eval's latex2sympy2 (math tasks only) pins antlr4 4.7.2; Hydra and OmegaConf parse with 4.9.
	$(BIN)/python -m pip install --quiet --no-deps 'antlr4-python3-runtime==4.9.3'
	touch $(STAMP)

test: install browser ## run the whole test suite offline (slow end-to-end tests included)
	$(OFFLINE) $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

CHROMIUM ?= /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser: ## Debian's chromium and chromium-driver for the report's browser test (installed when absent)
	@test -x $(CHROMIUM) || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium chromium-driver; }

test-fast: install browser ## the test suite without the slow end-to-end tests
	$(OFFLINE) $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist worksteal -m "not slow" $(PYTEST_ARGS)

lint: install ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

demo: install ## the whole pipeline on tiny models of every family and a generated benchmark, offline
	$(OFFLINE) $(VRLAB) task=demo demo.root=$(DEMO_ROOT)
	$(OFFLINE) $(VRLAB) -m task=features encoder=$(DEMO_ENCODERS) $(DEMO_ARGS) features.images=$(DEMO_ROOT)/images
	$(OFFLINE) $(VRLAB) task=make_benchmark $(DEMO_ARGS)
	$(OFFLINE) $(VRLAB) -m task=extract encoder=$(DEMO_ENCODERS) benchmark=synth-voc-trainval $(DEMO_ARGS)
	@# MLLM: a tiny LLM pretrained on the generated text; stage-1 adapters for every law candidate and both
	@# references; stage 2 on the conversations for every candidate; answers for a few images.
	$(OFFLINE) $(VRLAB) task=demo_llm experiment=demo $(DEMO_ARGS)
	$(OFFLINE) $(VRLAB) -m task=train stage=1 train.data=synth-captions experiment=demo \
		encoder=$(LAW_DEMO_ENCODERS),tiny/eva02-clip $(DEMO_ARGS)
	$(OFFLINE) $(VRLAB) -m task=train stage=2 train.data=synth-conversations experiment=demo \
		encoder=$(LAW_DEMO_ENCODERS) 'train.init_from=$${demo.root}/stage1/$${encoder}/adapter' $(DEMO_ARGS)
	$(OFFLINE) $(VRLAB) task=generate experiment=demo encoder=tiny/clip $(DEMO_ARGS)
	@# Evaluation with lmms-eval on the local tasks (synth_vqa: exact match, synth_mc: log-likelihood).
	$(OFFLINE) $(VRLAB) -m task=eval experiment=demo encoder=$(LAW_DEMO_ENCODERS) $(DEMO_ARGS)
	@# The AC law from the demo's own runs: C, A on projected tokens of each benchmark's images, the eval
	@# scores, the fit and the policy simulation.
	$(OFFLINE) $(VRLAB) -m task=correspondence experiment=demo encoder=$(LAW_DEMO_ENCODERS) $(DEMO_ARGS)
	$(OFFLINE) $(VRLAB) -m task=correspondence experiment=demo encoder=tiny/clip,tiny/dinov2 \
		correspondence=law $(DEMO_ARGS)
	$(OFFLINE) $(VRLAB) -m task=alignment experiment=demo encoder=$(LAW_DEMO_ENCODERS) $(DEMO_ARGS)
	$(OFFLINE) $(VRLAB) task=law_table experiment=demo $(DEMO_ARGS)
	$(OFFLINE) $(VRLAB) task=law_fit experiment=demo $(DEMO_ARGS)
	$(OFFLINE) $(VRLAB) task=law_policy experiment=demo $(DEMO_ARGS)
	@# The same law with A as the published paper defines it: caption likelihood under each stage-1 model.
	$(OFFLINE) $(VRLAB) -m task=alignment experiment=demo encoder=$(LAW_DEMO_ENCODERS) \
		alignment.protocol=caption_likelihood $(DEMO_ARGS)
	$(OFFLINE) $(VRLAB) task=law_table experiment=demo law.alignment_protocol=caption_likelihood \
		'law.out=$${paths.outputs}/law/table_caption_likelihood.csv' $(DEMO_ARGS)
	$(OFFLINE) $(VRLAB) task=law_fit experiment=demo 'law.table=$${paths.outputs}/law/table_caption_likelihood.csv' \
		$(DEMO_ARGS)
	@# LLM2CLIP: the tiny LLM fine-tuned on caption pairs, a CLIP stage of tiny CLIP against its stored caption
	@# embeddings, with retrieval before and after (`task=retrieval experiment=demo_llm2clip` reads the saved model).
	$(OFFLINE) $(VRLAB) task=llm2clip_text experiment=demo_llm2clip $(DEMO_ARGS)
	$(OFFLINE) $(VRLAB) task=llm2clip experiment=demo_llm2clip $(DEMO_ARGS)
	@# LMVR on the demo's stage-2 model: the aggregation sweep and the component comparison.
	$(OFFLINE) $(VRLAB) -m task=probe experiment=demo_lmvr probe.token_set=all,image,prompt,last probe.pooling=mean,max \
		probe.layer=-1,1 probe.moment=before,after $(DEMO_ARGS)
	$(OFFLINE) $(VRLAB) -m task=probe experiment=demo_lmvr probe.token_set=generated probe.pooling=mean,max \
		probe.layer=-1,1 probe.moment=after $(DEMO_ARGS)
	$(OFFLINE) $(VRLAB) -m task=probe experiment=demo_lmvr probe.features=encoder,adapter $(DEMO_ARGS)
	$(OFFLINE) $(VRLAB) task=probe_table experiment=demo_lmvr $(DEMO_ARGS)
	@# LMVR's eight tables: the model above, its copy tuned on the DeepFashion captions (Table 6) and a
	@# BLIP-2-style model, tiny EVA + a small Q-Former (Tables 7-8).
	$(OFFLINE) $(VRLAB) task=train stage=2 experiment=demo encoder=tiny/clip train.data=synth-deepfashion-train \
		'train.init_from=$${demo.root}/stage2/tiny/clip/model' 'train.out=$${demo.root}/lmvr/finetuned' $(DEMO_ARGS)
	$(OFFLINE) $(VRLAB) task=train stage=1 experiment=demo encoder=tiny/eva02-clip train.data=synth-captions \
		$(BLIP2_ADAPTER) 'train.out=$${demo.root}/lmvr/blip2-stage1' $(DEMO_ARGS)
	$(OFFLINE) $(VRLAB) task=train stage=2 experiment=demo encoder=tiny/eva02-clip train.data=synth-conversations \
		$(BLIP2_ADAPTER) 'train.init_from=$${demo.root}/lmvr/blip2-stage1/adapter' 'train.out=$${demo.root}/lmvr/blip2' \
		$(DEMO_ARGS)
	$(OFFLINE) $(VRLAB) task=lmvr_table experiment=demo_lmvr $(DEMO_ARGS)
	@# Word-to-image attention maps of the LMVR model on two scenes (the report shows them as a grid).
	$(OFFLINE) $(VRLAB) -m task=attention experiment=demo_lmvr \
		attention.image=$(DEMO_ROOT)/images/scene_000.png,$(DEMO_ROOT)/images/scene_001.png $(DEMO_ARGS)
	@# The experiment's report: one self-contained HTML page of everything above (its path is printed).
	$(OFFLINE) $(VRLAB) task=report experiment=demo $(DEMO_ARGS)

EXPERIMENT_NAME ?= demo
report: install ## the HTML report of EXPERIMENT_NAME's results under outputs/ (outputs/reports/<name>/index.html)
	$(VRLAB) task=report experiment=$(EXPERIMENT_NAME)

SCIENCE_ARGS ?=
SCIENCE_EXPERIMENT ?= science
science: install ## the AC law tested on encoders and MLLMs vrlab trains itself, offline; rewrites docs/science.md
	$(OFFLINE) $(VRLAB) task=science experiment=$(SCIENCE_EXPERIMENT) $(SCIENCE_ARGS)

resolution-demo: install ## the resolution study on the demo (after `make demo`): tiny CLIP at 32, 48, 64 px and anyres
	$(MAKE) resolution-study EXPERIMENT=demo_resolution STUDY_ARGS="$(DEMO_ARGS)" STUDY_ENV="$(OFFLINE)"

EXPERIMENT ?= resolution
STUDY_ARGS ?=
STUDY_ENV ?=
resolution-study: install ## one encoder at 224, 336, 448 px and anyres: stage 1 and 2, eval, C and A each, one table
	$(STUDY_ENV) $(VRLAB) -m $(SWEEP) task=train stage=1 experiment=$(EXPERIMENT) $(STUDY_ARGS) \
		'train.data=$${alignment.captions}'
	$(STUDY_ENV) $(VRLAB) -m $(SWEEP) task=train stage=2 experiment=$(EXPERIMENT) $(STUDY_ARGS) \
		'train.data=$${study.conversations}' 'train.init_from=$${paths.outputs}/stage1/$${study.setting}/adapter'
	$(STUDY_ENV) $(VRLAB) -m $(SWEEP) task=eval experiment=$(EXPERIMENT) $(STUDY_ARGS)
	$(STUDY_ENV) $(VRLAB) -m $(SWEEP) task=correspondence experiment=$(EXPERIMENT) $(STUDY_ARGS)
	$(STUDY_ENV) $(VRLAB) -m $(SWEEP) task=alignment experiment=$(EXPERIMENT) $(STUDY_ARGS)
	$(STUDY_ENV) $(VRLAB) task=law_table experiment=$(EXPERIMENT) $(STUDY_ARGS)

DEMO_HF_ENCODERS ?= tiny/clip,tiny/siglip,tiny/dinov2,tiny/dinov2-reg
proxies-demo: install ## the proxy leaderboard on the demo (after `make demo`): similarity proxies, layer sweep, LOO fit
	$(OFFLINE) $(VRLAB) -m task=proxies experiment=demo_proxies encoder=$(LAW_DEMO_ENCODERS) $(DEMO_ARGS)
	$(OFFLINE) $(VRLAB) -m task=proxies experiment=demo_proxies encoder=$(DEMO_HF_ENCODERS) extract.layers=all $(DEMO_ARGS)
	$(OFFLINE) $(VRLAB) task=proxy_fit experiment=demo_proxies $(DEMO_ARGS)

proxy-leaderboard: install ## the proxy leaderboard for ENCODERS on real weights (law.table: your law table or a paper's CSV)
	$(VRLAB) -m $(SWEEP) task=proxies experiment=proxies encoder=$(ENCODERS)
	$(VRLAB) task=proxy_fit experiment=proxies

perf: demo ## throughput reports (bare forward, end-to-end, naive) as JSON in outputs/perf/
	$(OFFLINE) $(VRLAB) -m task=perf encoder=$(PERF_ENCODERS) benchmark=synth-folder-train $(DEMO_ARGS)

law-ac: install ## the law paper's C (SPair-71k) and A, both protocols (stage-1 checkpoints in ADAPTERS), for its 15 settings
	$(VRLAB) -m $(SWEEP) task=correspondence experiment=law_ac
	VRLAB_ADAPTERS=$(ADAPTERS) $(VRLAB) -m $(SWEEP) task=alignment experiment=law_ac alignment.protocol=reference_cosine,caption_likelihood
	$(VRLAB) task=law_table law.protocol=law law.alignment_protocol=reference_cosine 'law.out=$${paths.outputs}/law/table_reference_cosine.csv'
	$(VRLAB) task=law_table law.protocol=law law.alignment_protocol=caption_likelihood 'law.out=$${paths.outputs}/law/table_caption_likelihood.csv'

law-paper: install ## the Law paper's whole pipeline for ENCODERS (default its 13) on real data; resumable
	$(VRLAB) -m $(SWEEP) task=train stage=1 train.data=llava-558k experiment=law_paper encoder=$(PAPER_TRAIN)
	$(VRLAB) -m $(SWEEP) task=train stage=2 train.data=llava-665k experiment=law_paper encoder=$(ENCODERS) \
		'train.init_from=$${runs}/stage1/$${encoder}/adapter'
	$(VRLAB) -m $(SWEEP) task=eval experiment=law_paper encoder=$(ENCODERS)
	$(VRLAB) -m $(SWEEP) task=alignment experiment=law_paper encoder=$(ENCODERS)
	$(VRLAB) -m $(SWEEP) task=correspondence experiment=law_paper encoder=$(ENCODERS)
	$(VRLAB) task=law_table experiment=law_paper
	$(VRLAB) task=law_fit experiment=law_paper
	$(VRLAB) task=law_policy experiment=law_paper

law-fit: install ## fit the AC law on TABLE=<csv>, simulate the AC policy and rank untrained candidates
	$(VRLAB) task=law_fit law.table=$(TABLE)
	$(VRLAB) task=law_policy law.table=$(TABLE)
	-$(VRLAB) task=law_recommend law.table=$(TABLE)

CHECKPOINT ?= outputs/train/stage2/model
lmvr-aggregation: install ## LMVR design-choice sweep on VOC2007 for CHECKPOINT (a stage-2 model)
	$(VRLAB) -m task=probe experiment=lmvr_aggregation checkpoint=$(CHECKPOINT) probe.token_set=all,image,prompt,last \
		probe.pooling=mean,max probe.layer=-1,1 probe.moment=before,after
	$(VRLAB) -m task=probe experiment=lmvr_aggregation checkpoint=$(CHECKPOINT) probe.token_set=generated \
		probe.pooling=mean,max probe.layer=-1,1 probe.moment=after
	$(VRLAB) task=probe_table

lmvr-components: install ## encoder vs adapter vs LLM features, multi-label VOC2007 and COCO, for CHECKPOINT
	$(VRLAB) -m task=probe experiment=lmvr_components checkpoint=$(CHECKPOINT) probe.features=encoder,adapter,llm
	$(VRLAB) -m task=probe experiment=lmvr_components checkpoint=$(CHECKPOINT) probe.features=encoder,adapter,llm \
		probe.train=coco-train2017 'probe.test=[coco-val2017]'
	$(VRLAB) task=probe_table

lmvr-domain-shift: install ## probe trained on VisDA synthetic, tested on real validation and test, for CHECKPOINT
	$(VRLAB) -m task=probe experiment=lmvr_domain_shift checkpoint=$(CHECKPOINT) probe.features=encoder,adapter,llm

lmvr-robustness: install ## probe trained on clean images, tested on ImageNet-C, for CHECKPOINT
	$(VRLAB) -m task=probe experiment=lmvr_robustness checkpoint=$(CHECKPOINT) probe.features=encoder,adapter,llm

FINETUNED ?= null
BLIP2 ?= null
LMVR_TABLE_ARGS = experiment=lmvr_paper checkpoint=$(CHECKPOINT) lmvr_table.finetuned=$(FINETUNED) lmvr_table.blip2=$(BLIP2)
lmvr-tables: install ## the LMVR paper's eight tables for CHECKPOINT (FINETUNED: Table 6's tuned model; BLIP2: Tables 7-8)
	$(VRLAB) task=lmvr_table $(LMVR_TABLE_ARGS)

lmvr-table%: install ## one LMVR table, e.g. make lmvr-table3 CHECKPOINT=... (Markdown and CSV in outputs/lmvr_tables)
	$(VRLAB) task=lmvr_table lmvr_table.table=$* $(LMVR_TABLE_ARGS)

clean: ## remove demo files and outputs (keeps .venv)
	rm -rf $(DEMO_ROOT) outputs .pytest_cache .ruff_cache
