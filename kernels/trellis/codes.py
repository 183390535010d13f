"""Bitshift-trellis codes: a 16-bit state s -> V values (the QTIP spec, section 5).

* ``1mad`` (V=1): x = (34038481 s + 76625530) mod 2^32; v = (sum of x's four bytes - 510) / 147.800537109375.
* ``3inst`` (V=1): x = (89226354 s + 64248484) mod 2^32; y = (x & 0x8FFF8FFF) ^ 0x3B603B60;
  v = fp16(y >> 16) + fp16(y & 0xFFFF), the halves' bits read as IEEE half and added in fp16.
* ``hyb`` (V=2, 9-bit LUT): h = s (s + 1) mod 2^32; v = tlut[(h >> 6) & 511], its first component
  negated when bit 15 of h is set. The LUT (512 x 2, fp16) is stored with every layer.

:data:`DEFAULT_TLUT` is the LUT the quantizer stores: Lloyd k-means with 512 centroids on 2^18
N(0, I_2) samples (seed 0, 60 iterations, started from N(0, I_2) centroids; :func:`kmeans_lut`),
rescaled so that the population std of its entries is sqrt(15/16), rounded to fp16 and embedded
below so that every machine quantizes with the same table.
"""
from __future__ import annotations

import functools

import torch

L = 16
N_STATES = 1 << L
CODES = ("hyb", "1mad", "3inst")
VALUES_PER_STATE = {"hyb": 2, "1mad": 1, "3inst": 1}
TLUT_BITS = 9

_DEFAULT_TLUT_HEX = (
    "c056bc46ba7e3fbdb401b850b849392eba0cb54631c7b588376fb8393453b4bb35a0409a39bd332c345c3b5a3b6e31d0"
    "b881bbd63e853a993b7dbf0eb4f63677b15536d1b4e83e98ba78a9afa84ca5c5b7b5bac23600c1ac3aa8347cb7eeb97a"
    "bd1fab193e181847c093bea53773b293bcf23bb32e233cf43446351c34a2ae443d00332abad33d1631e2b34c3046bc7b"
    "3a593f0db69a34fbbe2ec0d3b2792bc6be88b5dbb908be75bc9c3ef23268bf13bb48bbd62ceeb62fb4942f713cba3b38"
    "397fb2c6bc2f3da83986416d8a4d39e5b938b39fbdc4b82e38513a33bbef337331643728bc163c68381338cbbcd0bea5"
    "3c52b5e3b9661fc1378ab93fafae357838eb26b23ef9b8323eb3322fb53fbd29bb7dba2dae783f513d86b5a2bc513863"
    "a496b6e1308bb9693b16b89a32dd3957ba1eb883b602c04ebcb7b62cb9b533eaaded3af93abdb58abd19bb57b9313da1"
    "3b8ebc16b6632fc23d83b0e5bdcb294bb9b1bd1e26fb3331bcffb874af16bc02bc6ebc7a3319bdbaba162ec93c0a2d4e"
    "b46b38b6b5a03c21362c28bb3bf03d1330a0b77fb5a03ad0372d301739c1b5663a1dbbedbd7f3dc93951ad6cb5c432a8"
    "b047b8f19ee12c57b48ab42535de3edb32023a853ca32c4a3c59badcb8282f88bd7ab595a5ca3577bd69bca3bc41bb28"
    "39c837c2b587b5e1408a3b6f28aaae0d38e23979bc42b87fb65738f93d023dc035fb3576b95d395f2b08ba4bb7c9382e"
    "3667ba25a2a9c0c238acb893aeb03a013d51bab0c1123c273bce3548a8a4383dbcab3a0e3c6d39cabc68ac0c32293fd4"
    "3592b809bc57bd95b178b3a1b23eba143882ac60b94235f03424c0283cfd3c9d2b87212bb3303545b90eb91c379d1e6e"
    "3cceadc6bf74baa03d56bfd4ac47bfd2b5b9be142b7834e1b090b778b1573c373bd9bde0b8b633cab597ac3bc1ca34ad"
    "3fcc2a32b374aa10ba9841dab3e5bc53b606bb853e39365f38502dddbd082f5338273c28b908383f39bcbca1a5e730ee"
    "b972bfc72c5337e43bdc3ab22e1db44fbfd438b6220cb1f040d4b8a62cc0b856c040b42035e9b1662ac6be3f38913b2f"
    "3d523716bb33b4af39743c0c39cfb893b09238483872bf59b51434d6bd90b9b32f98336334f33a1bb406b0bfbc10b66a"
    "32e62d8334c02cce3fff3d82b83cb4483f02bccd3c4e3f07bcb13401ac19af5bc0fab314b052406aba4735e7b51526e3"
    "bc91c017b3cfbb1fbfb0342a3ce2bd3e321cbaa83a873c913c02bcdd3a7bb9b1b20c3103bc3b362cadad3e2fbde43c54"
    "be9c38e0bdc5b14dbf41409e3cc5b95fc1a3b97b3ca1385d3b12404c3dc533a43373bc01bc153b27c0782f32402ebd91"
    "b2b0b577bc472e07bb4635f738463fc8ba29b9c03a42ae9c36b43ae33b02c02eb91930463d1d399935703dff3fd8c02b"
    "3c9835f0ba943c24b87936f5beeb3d3a3472b9c93f523c0cbe9bb01238abbc133554340137d5b4e3ac68b9e03f54ba70"
    "3280af61b05fbce7be5a3f053982bac3302338a4b675bc61b9c13abb414f37c23557bb1ebe9a2f7e3c5232e937a0aecb"
    "b93f3cbdb6fc3dd7b894b0143d72b8a7bebebca738d2b5013f793fb9bc3cb3983603b46b37e6bb3fc0083c173533b611"
    "382432c33463b2403d9ebc5c3ab93b81ba49c0c13d983b7a33943c6b34c59de43f7735ab3ad339ee3b99b6c83540390f"
    "b6c23fd03f76b41a2bfe3663aa79b843b689b47f3edeab90b073bdb438ef317d3cd5b7952b2dbd3e32f5b892beab35ca"
    "bf33bdd0bd0d38dfbbdc399f3bf3b9a3357db8f1bdc2381d3a7ebd48baefb7133e22b9a4b79632fc38f43cc93d703f8e"
    "38dd3e4e34693163329ba041b6cf36c338f2385c3c193c3639c0be662efa39b8bf9ab7373a51b75f3811bcbc38153d79"
    "bceab2b2b7b2b86a300aab77bda6345fb3c637c5ad633915bb52beefad3bbaecb0c7b04e3cf7c102ab0b36f3c072b965"
    "b13a340b3859c0a3bca3405c4140bce5b6e7268fae5db576ba7d395cabf63414bb6fb0e23eccbe78406d34e7c0573e72"
    "3b4aaeff331a385bb8711fdc2ce33c4a3ed13896b7443d04ae852ca539c03580ae1a416e3a0c22e73e413e30b639bf30"
    "3d0bbe6fb41a3d8c2f653e8fbab3334d2cd1300cb900ba5ea8653bd8305c2a32416d3d733818377dbb362e2ebedc3b38"
    "3ac9368fb96daf83b9fcbb2cb770b194b238394d2f07b138366436ee3857ba35b408b6e9369d3cc036bdb6913e56bb7f"
    "308f3ba2b858bcb837ec356cba043821b8913a5dc0a0384f39db3924bb35383abae83aa739ff3d7a36823863b9a2b749"
    "acb0b33334ef37f9a0c1bc7ab433b94138e0366aab563ca3b9d3bc4bbe76bf60b5d6380fb84bbd8cb5f7b8e8b7a7b663"
    "b8a3b7eab7f13c583ce8b45535c5307ab5bcba213697be5338e5bd8bb8bb40a4b8dbb5bc36bcbd6530f635633c26aab5"
    "3e2cb773b70939fe3b18255abba0a4d9b35c3b813c35b8603bd739093b803dfd3c4fb261b9143bd9ac923d55aec63174"
    "384bb6ce27f138efbf96ad83bdbc3a54b603b7bd2f3e3dabb76ac194bea0b901b4223cc534473697b0f2beb610e4b4ce"
    "bda2bdc03bfb3798ba98bddfb43432fa3ff73931b2d83a6ab8a03ebc346dbcd7361bac413cb7bc31bab03e5e3b95b3ff"
    "33e0b7193debbd6eb776ac2532f433b42c2bbb8e399a2eae4078afb736c333a3bcee3ce3b8223553ba58b20d3ddf392f"
    "3e4eb412b7a13b5c3a8b30593b17bac2bb4db8d1bb35bcd139ac3a86234eb925b050a551401bb7c44177b0893d5d29de"
    "bd0036ab3e383cd4be23bb3b35f03c0f3636bc3ab5b2b1603937b988bc9bb9df3ad03878393ab71d403dbb863dc540ed"
    "38ce349c315730e72a4c3ada3895b213b4f939b93a89b32a36f839a834833d43")


@functools.cache
def _default_tlut() -> torch.Tensor:
    raw = [int(_DEFAULT_TLUT_HEX[i:i + 4], 16) for i in range(0, len(_DEFAULT_TLUT_HEX), 4)]
    raw = [v - 0x10000 if v >= 0x8000 else v for v in raw]
    return torch.tensor(raw, dtype=torch.int16).view(torch.float16).reshape(1 << TLUT_BITS, 2)


def default_tlut() -> torch.Tensor:
    """The embedded HYB LUT, float16 [512, 2] (a fresh copy)."""
    return _default_tlut().clone()


def kmeans_lut(n_samples: int = 1 << 18, k: int = 1 << TLUT_BITS, iters: int = 60, seed: int = 0) -> torch.Tensor:
    """How :data:`DEFAULT_TLUT` was made (minutes on a CPU; not called at run time)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_samples, 2, generator=g)
    c = torch.randn(k, 2, generator=g)
    for _ in range(iters):
        d = (x * x).sum(1, keepdim=True) - 2 * x @ c.t() + (c * c).sum(1)[None]
        a = d.argmin(1)
        cnt = torch.bincount(a, minlength=k).float()
        s = torch.zeros(k, 2).index_add_(0, a, x)
        empty = cnt == 0
        c = torch.where(empty[:, None], x[torch.randint(0, n_samples, (k,), generator=g)],
                        s / cnt.clamp(min=1)[:, None])
    c = c * ((15 / 16) ** 0.5 / c.std(unbiased=False))
    return c.half()


def _check_code(code: str) -> None:
    if code not in CODES:
        raise ValueError(f"unknown trellis code {code!r}; codes: {list(CODES)}")


def decode(states: torch.Tensor, code: str, tlut: torch.Tensor | None = None) -> torch.Tensor:
    """Values of 16-bit states (any integer tensor, values in [0, 2^16)): float32 [..., V]."""
    _check_code(code)
    s = states.to(torch.int64) & 0xFFFF
    if code == "1mad":
        x = (34038481 * s + 76625530) & 0xFFFFFFFF
        b = (x & 255) + ((x >> 8) & 255) + ((x >> 16) & 255) + ((x >> 24) & 255)
        return ((b - 510).float() / 147.800537109375).unsqueeze(-1)
    if code == "3inst":
        x = (89226354 * s + 64248484) & 0xFFFFFFFF
        y = (x & 0x8FFF8FFF) ^ 0x3B603B60
        hi, lo = (y >> 16) & 0xFFFF, y & 0xFFFF
        hi = ((hi ^ 0x8000) - 0x8000).to(torch.int16).view(torch.float16)
        lo = ((lo ^ 0x8000) - 0x8000).to(torch.int16).view(torch.float16)
        return (hi + lo).float().unsqueeze(-1)  # the addition is done in fp16
    if tlut is None:
        raise ValueError("the hyb code needs its LUT (tlut float16 [512, 2])")
    h = (s * (s + 1)) & 0xFFFFFFFF
    v = tlut.float().to(s.device)[(h >> 6) & 511]
    flip = ((h >> 15) & 1).bool()
    return torch.stack((torch.where(flip, -v[..., 0], v[..., 0]), v[..., 1]), dim=-1)


def code_table(code: str, tlut: torch.Tensor | None = None) -> torch.Tensor:
    """The values of all 2^16 states: float32 [65536, V]."""
    return decode(torch.arange(N_STATES), code, tlut)


def code_rms(code: str, tlut: torch.Tensor | None = None) -> float:
    """RMS of the code over all states (1mad 1.0001, 3inst 1.2437, hyb ~0.968)."""
    return float(code_table(code, tlut).double().pow(2).mean().sqrt())
