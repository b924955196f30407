using DiffBIR.Lab.Diffusion;
using DiffBIR.Lab.Pipeline;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Sampling;

/// <summary>
/// Tiled noise prediction (official v2.0.0 <c>SpacedSampler.predict_noise_tiled</c>, after MultiDiffusion / CCSR):
/// the latent is cut into overlapping tiles (<see cref="Tiling.SlidingWindows"/>, the last tile flush with the
/// border), the network runs on each tile with the condition latent c_img cropped to the same window (c_txt and the
/// control scales are shared), and the tile outputs are blended with gaussian weights (<see cref="Tiling.GaussianWeights"/>,
/// float64 rounded to float32 as the official code does) and divided by the summed weights.
/// <para>It wraps the network itself (<see cref="IDenoiser"/> → <see cref="IDenoiser"/>), so every sampler and both CFG
/// batchings use it unchanged. The official code mixes the two CFG branches per tile and then blends; here each branch is
/// blended and then mixed. Both the blend and the CFG mix are affine with weights that sum to one, so the two orders
/// give the same ε up to float32 rounding (the v2_tiled fixture checks it).</para>
/// <para>A latent no larger than one tile is passed to the network whole. Sizes are in latent pixels (the official
/// arguments are in image pixels and divided by 8: <see cref="FromImagePixels"/>).</para>
/// </summary>
public sealed class TiledDenoiser : IDenoiser
{
    public IDenoiser Network { get; }
    /// <summary>Tile side in latent pixels (official <c>tile_size // 8</c>).</summary>
    public int TileSize { get; }
    /// <summary>Distance between tile origins in latent pixels (official <c>tile_stride // 8</c>).</summary>
    public int TileStride { get; }

    public TiledDenoiser(IDenoiser network, int tileSize, int tileStride)
    {
        if (tileSize < 1) throw new ArgumentOutOfRangeException(nameof(tileSize), tileSize, "tile size must be ≥ 1 latent pixel");
        if (tileStride < 1 || tileStride > tileSize)
            throw new ArgumentOutOfRangeException(nameof(tileStride), tileStride, $"tile stride must be in 1..{tileSize} (the tile size) so that tiles overlap or touch");
        Network = network; TileSize = tileSize; TileStride = tileStride;
    }

    /// <summary>From the official pixel arguments (<c>--tile_size 512 --tile_stride 256</c> → 64, 32 latent pixels).</summary>
    public static TiledDenoiser FromImagePixels(IDenoiser network, int tileSize, int tileStride, int latentFactor = 8) =>
        new(network, tileSize / latentFactor, tileStride / latentFactor);

    public Tensor Forward(Tensor x, Tensor t, Conditioning cond)
    {
        int h = (int)x.shape[2], w = (int)x.shape[3];
        if (h <= TileSize && w <= TileSize) return Network.Forward(x, t, cond);
        if (h < TileSize || w < TileSize)
            throw new ArgumentException($"tiled noise prediction: latent {h}×{w} is smaller than the tile ({TileSize}) in one direction; " +
                                        $"use a tile size ≤ {Math.Min(h, w)} or pad the image");
        if (cond.CImage.shape[2] != h || cond.CImage.shape[3] != w)
            throw new ArgumentException($"tiled noise prediction: c_img is [{string.Join(",", cond.CImage.shape)}] but x_t is [{string.Join(",", x.shape)}]; the condition latent must cover the same pixels");
        // the one tile blend (Tiling.Apply); each tile's network sees c_img cropped to the same window
        return Tiling.Apply(x, (tile, win) => Network.Forward(tile, t, cond with { CImage = cond.CImage[.., .., win.Top..win.Bottom, win.Left..win.Right] }),
                            TileSize, TileStride);
    }
}
