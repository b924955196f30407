using DiffBIR.Lab.Diffusion;
using DiffBIR.Lab.Models;
using DiffBIR.Lab.Pipeline;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Stages;

/// <summary>
/// The encode stage: the stage-1 restoration I_RM (RGB in [0, 1]) and a prompt → the condition of the IRControlNet
/// (official <c>ControlLDM.prepare_condition</c>): the condition latent c_img = E(2·I_RM − 1)·0.18215 (VAE posterior
/// mode, no sampling) and the text embedding c_txt (OpenCLIP, penultimate layer). The negative condition of
/// classifier-free guidance shares c_img and differs in the text (<see cref="Text"/> of the negative prompt).
/// </summary>
public sealed class Encode
{
    public ControlLDM Model { get; }

    public Encode(ControlLDM model) => Model = model;

    /// <summary>c = (c_txt(prompt), c_img(I_RM)) for one prompt per image (the official default prompt is "").</summary>
    public Conditioning Apply(Tensor restored, string prompt = "")
    {
        using var _ = torch.no_grad();
        var prompts = Enumerable.Repeat(prompt, (int)restored.shape[0]).ToArray();
        return Model.PrepareCondition(restored, prompts);
    }

    /// <summary>c_img = E(2·I_RM − 1)·0.18215 (posterior mode).</summary>
    public Tensor Image(Tensor restored)
    {
        using var _ = torch.no_grad();
        using var scope = torch.NewDisposeScope();
        return Model.VaeEncode(restored * 2 - 1).MoveToOuterDisposeScope();
    }

    /// <summary>c_txt of one prompt per batch element, [N, 77, ctx].</summary>
    public Tensor Text(string prompt, int batch = 1)
    {
        using var _ = torch.no_grad();
        return Model.clip.Encode(Enumerable.Repeat(prompt, batch).ToArray());
    }

    /// <summary>The guidance target in the decoder's range: 2·I_RM − 1 (as the official run_stage2 loads it).</summary>
    public static Tensor Target(Tensor restored) => restored * 2 - 1;

    /// <summary>
    /// The diffusion-space latent of an image in [−1, 1]: the posterior mode, or with <paramref name="posteriorNoise"/>
    /// a posterior sample whose standard normal is drawn from it (official <c>vae_encode(x, sample=True)</c>); the
    /// shared-GroupNorm tiled encoder when <paramref name="tiled"/> (tiles of <paramref name="tileSize"/> px).
    /// </summary>
    public static Tensor Latent(ControlLDM model, Tensor image, INoiseSource? posteriorNoise = null, bool tiled = false, int tileSize = -1)
    {
        using var _ = torch.no_grad();
        using var scope = torch.NewDisposeScope();
        Tensor? eps = null;
        if (posteriorNoise is not null)
        {
            // the official code draws after the encoder ran; only the order among draws matters
            long down = 1L << (model.Config.Vae.DdConfig.ChMult.Length - 1);
            var shape = new[] { image.shape[0], (long)model.Config.Vae.EmbedDim, image.shape[2] / down, image.shape[3] / down };
            using var like = torch.empty(shape, image.dtype, image.device);
            eps = posteriorNoise.Next(like);
        }
        return model.VaeEncode(image, eps, tiled, tileSize).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// v2.0.0's <c>vae_encode_tiled</c>: latent tiles of <paramref name="tileSize"/>/8 every <paramref name="tileStride"/>/8
    /// latent pixels (sizes in image pixels, multiples of 8), each tile's image encoded alone (<see cref="Latent"/>:
    /// mode, or one posterior draw per tile in tile order) and blended with the gaussian weights (<see cref="Tiling.Apply"/>).
    /// </summary>
    public static Tensor BlendedTiles(ControlLDM model, Tensor image, int tileSize, int tileStride, INoiseSource? posteriorNoise = null)
    {
        long down = 1L << (model.Config.Vae.DdConfig.ChMult.Length - 1);
        return Tiling.Apply(image, (tile, _) => Latent(model, tile, posteriorNoise), tileSize, tileStride, scale: down, scaleUp: false,
                            outChannels: model.Config.Vae.EmbedDim);
    }
}
