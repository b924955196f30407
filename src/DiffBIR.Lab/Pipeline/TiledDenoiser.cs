using DiffBIR.Lab.Diffusion;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Pipeline;

/// <summary>
/// Tiled diffusion as the official HEAD samplers do it (every sampler's <c>sample(tiled=True)</c> replaces
/// <c>model.forward</c> by <c>make_tiled_fn</c>): each network call — positive and negative branch separately, or the
/// batched call of DDIM / DPM-Solver — runs on latent tiles of <see cref="TileSize"/> every <see cref="TileStride"/>,
/// with the matching crop of c_img and the full c_txt, and the tiles are blended with the gaussian weights. Because
/// the wrapping is at the network, every sampler gets it unchanged.
/// <para>Merge note: the Stages/Sampling helper may provide its own tiled denoiser; this one is the pipeline's.</para>
/// </summary>
public sealed class TiledDenoiser : IDenoiser
{
    public IDenoiser Inner { get; }
    /// <summary>Latent tile side (official <c>cldm_tile_size // 8</c>).</summary>
    public int TileSize { get; }
    /// <summary>Latent stride (official <c>cldm_tile_stride // 8</c>).</summary>
    public int TileStride { get; }

    public TiledDenoiser(IDenoiser inner, int tileSize, int tileStride)
    {
        if (tileSize <= 0 || tileStride <= 0) throw new ArgumentOutOfRangeException(nameof(tileSize), "tile size and stride must be positive");
        Inner = inner; TileSize = tileSize; TileStride = tileStride;
    }

    public Tensor Forward(Tensor x, Tensor t, Conditioning cond) =>
        Tiling.Apply(x, (tile, box) =>
        {
            var cImg = cond.CImage[.., .., box.Top..box.Bottom, box.Left..box.Right];
            return Inner.Forward(tile, t, cond with { CImage = cImg });
        }, TileSize, TileStride);
}
