using DiffBIR.Lab.Diffusion;
using DiffBIR.Lab.Models.StableDiffusion;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Training;

/// <summary>
/// Trains the UNet as a latent diffusion prior (the LDM recipe Stable Diffusion was trained with): z₀ are latents of
/// the frozen VAE times the latent scale factor, t ~ U[0, T), ε ~ N(0, I), x_t = √ᾱ_t z₀ + √(1 − ᾱ_t) ε, and the UNet
/// predicts ε (v2 schedule) or v (v2.1) given a fixed text context c_txt from the frozen CLIP;
/// loss = mean((target − UNet(x_t, t, c_txt))²).
/// </summary>
public static class PriorTrainer
{
    /// <summary>Default learning rate of the tiny recipe.</summary>
    public const double LearningRate = 5e-4;

    /// <summary>AdamW over the UNet (betas (0.9, 0.999), weight decay 0.01 as torch's default).</summary>
    public static optim.Optimizer CreateOptimizer(UNetModel unet, double learningRate = LearningRate) =>
        optim.AdamW(unet.parameters(), learningRate, 0.9, 0.999, 1e-8, weight_decay: 0.01);

    /// <summary>
    /// One step: <paramref name="z0"/> [B, C, h, w] scaled latents, <paramref name="context"/> [1 or B, L, D] (the
    /// frozen CLIP's encoding of the prompt). Draws t, then the noise. Returns the loss.
    /// </summary>
    public static double Step(UNetModel unet, NoiseSchedule schedule, Tensor z0, Tensor context, optim.Optimizer optimizer, ITrainingDraws draws)
    {
        if (z0.dim() != 4) throw new ArgumentException($"latents must be [B, C, h, w], got [{string.Join(",", z0.shape)}]", nameof(z0));
        using var scope = NewDisposeScope();
        unet.train();
        var device = unet.parameters().First().device;
        long b = z0.shape[0];
        var z = z0.to(device).to(ScalarType.Float32);
        var ctx = context.shape[0] == b ? context.to(device) : context.to(device).expand(b, -1, -1);
        var t = draws.RandInt(schedule.Timesteps, new[] { b }, device, "t");
        var noise = draws.Randn(z.shape, ScalarType.Float32, device, "p_losses_noise");
        var xt = schedule.QSample(z, t, noise);
        var output = unet.forward(xt, t, ctx);
        var target = schedule.Parameterization == Parameterization.Eps ? noise : schedule.Velocity(z, t, noise);
        var loss = nn.functional.mse_loss(output, target);
        optimizer.zero_grad();
        loss.backward();
        optimizer.step();
        return loss.item<float>();
    }
}
