using DiffBIR.Lab.Models.Vae;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Training;

/// <summary>The losses of one autoencoder step (plain numbers; the tensors are gone).</summary>
/// <param name="Loss">what was minimised: L1 + MSE + <c>klWeight</c>·KL</param>
/// <param name="L1">mean |x − D(z)| over pixels, x and D(z) in [−1, 1]</param>
/// <param name="Mse">mean (x − D(z))² over pixels</param>
/// <param name="Kl">KL(q(z|x) ‖ N(0, I)) per latent element (mean over batch, channels and positions)</param>
public sealed record VaeStepLosses(double Loss, double L1, double Mse, double Kl);

/// <summary>
/// Trains the KL-f8 autoencoder (Stable Diffusion's <c>AutoencoderKL</c>) from scratch on images in [−1, 1]:
/// z = μ + σ·ε from the posterior, reconstruction D(z), loss = L1 + MSE + w·KL with a small w (the LDM recipe's
/// reconstruction term and KL regulariser; no LPIPS, no discriminator — the tiny model has none of their weights).
/// The KL is taken per latent element, so w is independent of the image size.
/// </summary>
public static class VaeTrainer
{
    /// <summary>Default learning rate of the tiny recipe (AdamW, betas (0.5, 0.9) as the LDM autoencoder recipe).</summary>
    public const double LearningRate = 1e-3;
    /// <summary>Default KL weight (per latent element).</summary>
    public const double KlWeight = 1e-5;

    public static optim.Optimizer CreateOptimizer(AutoencoderKL vae, double learningRate = LearningRate) =>
        optim.AdamW(vae.parameters(), learningRate, 0.5, 0.9, 1e-8, weight_decay: 0);

    /// <summary>
    /// One step on <paramref name="imagesNchw"/> [B, 3, H, W] in [−1, 1] (H, W multiples of 8): posterior noise from
    /// <paramref name="draws"/>, then <c>zero_grad; backward; step</c>.
    /// </summary>
    public static VaeStepLosses Step(AutoencoderKL vae, Tensor imagesNchw, optim.Optimizer optimizer, ITrainingDraws draws, double klWeight = KlWeight)
    {
        if (imagesNchw.dim() != 4 || imagesNchw.shape[1] != 3 || imagesNchw.shape[2] % 8 != 0 || imagesNchw.shape[3] % 8 != 0)
            throw new ArgumentException($"VAE batch must be [B, 3, H, W] with H, W multiples of 8, got [{string.Join(",", imagesNchw.shape)}]", nameof(imagesNchw));
        using var scope = NewDisposeScope();
        vae.train();
        var device = vae.parameters().First().device;
        var x = imagesNchw.to(device).to(ScalarType.Float32);
        using var posterior = vae.Encode(x);
        var eps = draws.Randn(posterior.Mean.shape, ScalarType.Float32, device, "vae_posterior_noise");
        var rec = vae.Decode(posterior.Sample(eps));
        var l1 = (rec - x).abs().mean();
        var mse = (rec - x).square().mean();
        var kl = (0.5 * (posterior.Mean.square() + posterior.Var - 1 - posterior.LogVar)).mean();
        var loss = l1 + mse + klWeight * kl;
        optimizer.zero_grad();
        loss.backward();
        optimizer.step();
        return new VaeStepLosses(loss.item<float>(), l1.item<float>(), mse.item<float>(), kl.item<float>());
    }
}
