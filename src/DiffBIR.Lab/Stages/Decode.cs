using DiffBIR.Lab.Models;
using DiffBIR.Lab.Pipeline;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Stages;

/// <summary>
/// The decode stage: latent z → image D(z/0.18215) in about [−1, 1] (official <c>ControlLDM.vae_decode</c>). Any
/// latent → image function fits (e.g. a tiled VAE decoder for large images).
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

    /// <summary>
    /// v2.0.0's <c>vae_decode_tiled</c>: latent tiles of <paramref name="tileSize"/> every <paramref name="tileStride"/>
    /// latent pixels, each decoded alone and blended with the gaussian weights (<see cref="Tiling.Apply"/>).
    /// </summary>
    public static Tensor BlendedTiles(ControlLDM model, Tensor z, int tileSize, int tileStride)
    {
        using var _ = torch.no_grad();
        long up = 1L << (model.Config.Vae.DdConfig.ChMult.Length - 1);
        return Tiling.Apply(z, (tile, window) => model.VaeDecode(tile), tileSize, tileStride, scale: up, outChannels: model.Config.Vae.DdConfig.OutCh);
    }
}
