using DiffBIR.Lab.Models;
using DiffBIR.Lab.Pipeline;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Stages;

/// <summary>
/// The decode stage: latent z → image D(z/0.18215) in about [−1, 1] (official <c>ControlLDM.vae_decode</c>). Any
/// latent → image function fits (e.g. a tiled VAE decoder for large images); <see cref="Differentiable"/> is the one
/// rgb-space guidance back-propagates through.
/// </summary>
public sealed class Decode
{
    readonly Func<Tensor, Tensor> _decode;

    public Decode(ControlLDM model) : this(z => model.VaeDecode(z)) { }

    public Decode(Func<Tensor, Tensor> decoder) => _decode = decoder;

    /// <summary>The image of a latent, without gradient.</summary>
    public Tensor Apply(Tensor latent)
    {
        using var _ = torch.no_grad();
        return _decode(latent);
    }

    /// <summary>The image of a latent with the autograd graph kept (for restoration guidance in rgb space).</summary>
    public Tensor Differentiable(Tensor latent)
    {
        using var _ = torch.enable_grad();
        return _decode(latent);
    }

    /// <summary>
    /// v2.0.0's <c>vae_decode_tiled</c>: latent tiles of <paramref name="tileSize"/> every <paramref name="tileStride"/>
    /// latent pixels, each decoded alone and blended with the gaussian weights (<see cref="Tiling.Apply"/>).
    /// </summary>
    public static Tensor BlendedTiles(ControlLDM model, Tensor z, int tileSize, int tileStride)
    {
        using var _ = torch.no_grad();
        long up = 1L << (model.Config.Vae.DdConfig.ChMult.Length - 1);
        return Tiling.Apply(z, (tile, _) => model.VaeDecode(tile), tileSize, tileStride, scale: up, outChannels: model.Config.Vae.DdConfig.OutCh);
    }

    /// <summary>Image in [−1, 1] → [0, 1] (the pipeline's <c>(x + 1)/2</c> before colour correction).</summary>
    public static Tensor ToUnitRange(Tensor image) => (image + 1) / 2;
}
