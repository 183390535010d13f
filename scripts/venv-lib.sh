# Sourced by setup.sh and setup-vllm.sh: build a venv from one requirements file, once.
# gq_ensure_venv DIR REQUIREMENTS: (re)creates DIR unless a previous build of it completed.
gq_ensure_venv() {
    local venv="$1" reqs="$2"
    if [ -x "$venv/bin/python" ] && [ -f "$venv/.complete" ]; then
        return 0
    fi
    echo "[setup] creating $venv from $reqs" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    "$venv/bin/pip" install -q -r "$reqs"
    # PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import transformers`
    # and `import vllm` next to the CPU torch.
    "$venv/bin/pip" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
    touch "$venv/.complete"
}

# gq_key FILE: a short hash of a requirements file, so a change of pins gets a new venv.
gq_key() {
    sha256sum "$1" | cut -c1-12
}
