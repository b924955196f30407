using DiffBIR.Lab.Diffusion;
using DiffBIR.Lab.Guidance;
using DiffBIR.Lab.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Stages;

/// <summary>
/// The guide stage for ControlLDM: restoration guidance (paper §3.3) toward the stage-1 restoration, wired as the
/// official v2.0.0 sampler does it (<c>apply_cond_fn</c>). The target is 2·I_RM − 1; rgb space back-propagates the
/// loss gradient through the VAE decoder (D(x̂₀/0.18215)); latent space compares x̂₀ with the target re-encoded at every
/// repeat — officially with posterior sampling (<c>vae_encode(target)</c>, sample=True), so with a noise source the
/// encode draws one standard normal per repeat from it (in the official order: before the sampler's own draw); without
/// one the posterior mode is used.
/// <para>With tiled noise prediction (<see cref="Sampling.TiledDenoiser"/>) the official code refuses guidance. Here
/// guidance is defined on the whole blended x̂₀: after each tiled prediction the full-size x̂₀ is guided as one image
/// (rgb space decodes the whole latent, or whatever the decoder given to <see cref="For"/> does, e.g. a tiled decoder). The
/// loss is the same Σ_n mean_CHW of the untiled case.</para>
/// </summary>
public static class GuideStage
{
    /// <summary>The guide toward <paramref name="restored"/> (I_RM in [0, 1]); <paramref name="noise"/> feeds the
    /// latent-space target encoding, <paramref name="decoder"/> replaces the whole-image VAE decoder (rgb space).</summary>
    public static Guide For(ControlLDM model, RestorationGuidance guidance, Tensor restored, INoiseSource? noise = null,
                            Func<Tensor, Tensor>? decoder = null)
    {
        var target = Encode.Target(restored);
        return new Guide(guidance, target)
        {
            Decode = decoder ?? (z => model.VaeDecode(z)),
            EncodeTarget = guidance.Space == GuidanceSpace.Latent ? t => Encode.Latent(model, t, noise) : null,
        };
    }
}
