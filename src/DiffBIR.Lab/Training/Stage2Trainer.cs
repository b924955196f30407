using DiffBIR.Lab.Diffusion;
using DiffBIR.Lab.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Training;

/// <summary>Everything one stage-2 step computed before the optimizer step (detached), as train_stage2.py names it.</summary>
public sealed record Stage2StepResult(
    Tensor Loss, Tensor Z0, Tensor Clean, Tensor CTxt, Tensor CImg, Tensor CImgAug, Tensor T, Tensor XNoisy,
    Tensor ModelOutput, Tensor Target) : IDisposable
{
    public void Dispose()
    {
        foreach (var t in new[] { Loss, Z0, Clean, CTxt, CImg, CImgAug, T, XNoisy, ModelOutput, Target }) t.Dispose();
    }
}

/// <summary>
/// One IRControlNet training step as the official <c>train_stage2.py</c> makes it. Only the ControlNet learns; the
/// UNet, VAE and CLIP are frozen and in eval mode (official <c>load_pretrained_sd</c>), the stage-1 model runs in eval
/// mode without gradients. Per step: z₀ = VAE posterior SAMPLE of gt × 0.18215; clean = stage1(lq); condition
/// c_txt = CLIP(prompt), c_img = VAE posterior MODE of 2·clean − 1 × 0.18215; optional noise augmentation of c_img
/// with t_aug ~ U[0, noise_aug_timestep); t ~ U[0, T); x_t = q_sample(z₀, t, ε); target ε (v2) or v (v2.1);
/// loss = mean((target − out)²); <c>zero_grad; backward; AdamW.step</c>.
/// </summary>
public static class Stage2Trainer
{
    /// <summary>Official learning rates: configs/train/train_stage2.yaml (v2) and train_stage2_v2.1.yaml.</summary>
    public const double LearningRateV2 = 1e-4, LearningRateV2_1 = 1e-5;
    /// <summary>Official noise augmentation of the condition latent: off for v2, 200 for v2.1.</summary>
    public const int NoiseAugV2 = 0, NoiseAugV2_1 = 200;

    /// <summary>
    /// Freezes what the official <c>load_pretrained_sd</c> freezes (UNet, VAE, CLIP: no gradients, eval mode for
    /// good) and puts the ControlNet in training mode.
    /// </summary>
    public static void Prepare(ControlLDM cldm)
    {
        foreach (var m in new nn.Module[] { cldm.unet, cldm.vae, cldm.clip })
        {
            m.eval();
            foreach (var p in m.parameters()) p.requires_grad = false;
        }
        cldm.controlnet.train();
        foreach (var p in cldm.controlnet.parameters()) p.requires_grad = true;
    }

    /// <summary>
    /// The official start of stage-2 training: <c>load_pretrained_sd(sd)</c> (UNet, VAE and CLIP from a Stable
    /// Diffusion checkpoint; unused and missing keys reported), <c>load_controlnet_from_unet()</c> (every ControlNet key
    /// the UNet has is copied, the first conv gets zero input channels for the hint, the zero convs keep their
    /// constructor zeros), then <see cref="Prepare"/>.
    /// </summary>
    public static (IReadOnlyList<string> Unused, IReadOnlyList<string> Missing, IReadOnlyList<string> InitWithNewZero, IReadOnlyList<string> InitWithScratch)
        InitFromStableDiffusion(ControlLDM cldm, IReadOnlyDictionary<string, Tensor> sd, string sourceName = "SD checkpoint")
    {
        var (unused, missing) = cldm.LoadPretrainedSd(sd, sourceName);
        var (newZero, scratch) = cldm.controlnet.LoadFromUNet(cldm.unet);
        Prepare(cldm);
        return (unused, missing, newZero, scratch);
    }

    /// <summary>The official optimizer: <c>AdamW(cldm.controlnet.parameters(), lr)</c> with torch's defaults (betas (0.9, 0.999), eps 1e-8, weight decay 0.01).</summary>
    public static optim.Optimizer CreateOptimizer(ControlLDM cldm, double learningRate) =>
        optim.AdamW(cldm.controlnet.parameters(), learningRate, 0.9, 0.999, 1e-8, weight_decay: 0.01);

    /// <summary>
    /// One step on a loader batch: <paramref name="gtNhwc"/> [B, H, W, 3] in [-1, 1], <paramref name="lqNhwc"/>
    /// [B, H, W, 3] in [0, 1], one prompt per sample (prompt dropout happens in the dataset, not here). Draws, in the
    /// official order: posterior noise, (noise_aug &gt; 0) t_aug and its noise, t, the diffusion noise.
    /// </summary>
    public static Stage2StepResult Step(ControlLDM cldm, nn.Module<Tensor, Tensor> stage1, NoiseSchedule schedule, int noiseAugTimestep,
        Tensor gtNhwc, Tensor lqNhwc, IReadOnlyList<string> prompts, optim.Optimizer optimizer, ITrainingDraws draws)
    {
        using var scope = NewDisposeScope();
        var r = Forward(cldm, stage1, schedule, noiseAugTimestep, gtNhwc, lqNhwc, prompts, draws);
        optimizer.zero_grad();
        r.Loss.backward();
        optimizer.step();
        Tensor Out(Tensor x) => x.detach().MoveToOuterDisposeScope();
        return new Stage2StepResult(Out(r.Loss), Out(r.Z0), Out(r.Clean), Out(r.CTxt), Out(r.CImg), Out(r.CImgAug), Out(r.T), Out(r.XNoisy),
            Out(r.ModelOutput), Out(r.Target));
    }

    /// <summary>
    /// The forward half of <see cref="Step"/>: the loss with its graph (for a loop that accumulates gradients over
    /// micro-batches), in the caller's dispose scope; same draws in the same order.
    /// </summary>
    public static Tensor Loss(ControlLDM cldm, nn.Module<Tensor, Tensor> stage1, NoiseSchedule schedule, int noiseAugTimestep,
        Tensor gtNhwc, Tensor lqNhwc, IReadOnlyList<string> prompts, ITrainingDraws draws) =>
        Forward(cldm, stage1, schedule, noiseAugTimestep, gtNhwc, lqNhwc, prompts, draws).Loss;

    static Stage2StepResult Forward(ControlLDM cldm, nn.Module<Tensor, Tensor> stage1, NoiseSchedule schedule, int noiseAugTimestep,
        Tensor gtNhwc, Tensor lqNhwc, IReadOnlyList<string> prompts, ITrainingDraws draws)
    {
        if (gtNhwc.dim() != 4 || gtNhwc.shape[3] != 3 || lqNhwc.dim() != 4 || lqNhwc.shape[3] != 3 || gtNhwc.shape[0] != lqNhwc.shape[0])
            throw new ArgumentException($"stage-2 batch: gt [{string.Join(",", gtNhwc.shape)}] and lq [{string.Join(",", lqNhwc.shape)}] must be [B, H, W, 3]");
        if (prompts.Count != gtNhwc.shape[0])
            throw new ArgumentException($"stage-2 batch: {prompts.Count} prompts for {gtNhwc.shape[0]} samples");
        if (noiseAugTimestep < 0 || noiseAugTimestep > schedule.Timesteps)
            throw new ArgumentException($"noise_aug_timestep {noiseAugTimestep} is not in [0, {schedule.Timesteps}]");
        Prepare(cldm);
        stage1.eval();
        var device = cldm.controlnet.parameters().First().device;
        long b = gtNhwc.shape[0];
        var gt = gtNhwc.to(device).permute(0, 3, 1, 2).contiguous().to(ScalarType.Float32);
        var lq = lqNhwc.to(device).permute(0, 3, 1, 2).contiguous().to(ScalarType.Float32);

        Tensor z0, clean, cTxt, cImg, cImgAug;
        using (no_grad())
        {
            // vae_encode(gt) with sample=True: posterior.sample() draws its noise after the encoder ran.
            using (var posterior = cldm.vae.Encode(gt))
            {
                var eps0 = draws.Randn(posterior.Mean.shape, posterior.Mean.dtype, device, "posterior_noise(vae_encode(gt).sample())");
                z0 = posterior.Sample(eps0) * cldm.Config.LatentScaleFactor;
            }
            clean = stage1.forward(lq);
            var cond = cldm.PrepareCondition(clean, prompts);
            cTxt = cond.CText; cImg = cond.CImage;
            cImgAug = cImg;
            if (noiseAugTimestep > 0)
            {
                var tAug = draws.RandInt(noiseAugTimestep, new[] { b }, device, "noise_aug_t");
                var nAug = draws.Randn(cImg.shape, cImg.dtype, device, "noise_aug_noise");
                cImgAug = schedule.QSample(cImg, tAug, nAug);
            }
        }
        var (loss, t, xNoisy, output, target) = PLosses(cldm, schedule, z0, cTxt, cImgAug, draws);
        return new Stage2StepResult(loss, z0, clean, cTxt, cImg, cImgAug, t, xNoisy, output, target);
    }

    /// <summary>Official <c>p_losses</c> of the ControlLDM: t ~ U{0…T−1}, then the noise, x_t, the model's ε or v and the
    /// mean squared error to its target (draws in the official order: t, then the noise).</summary>
    static (Tensor Loss, Tensor T, Tensor XNoisy, Tensor Output, Tensor Target) PLosses(ControlLDM cldm, NoiseSchedule schedule, Tensor z0,
        Tensor cTxt, Tensor cImg, ITrainingDraws draws)
    {
        var device = z0.device;
        var t = draws.RandInt(schedule.Timesteps, new[] { z0.shape[0] }, device, "t");
        var noise = draws.Randn(z0.shape, z0.dtype, device, "p_losses_noise");
        var xNoisy = schedule.QSample(z0, t, noise);
        var output = cldm.Forward(xNoisy, t, new Conditioning(cTxt, cImg));
        var target = schedule.Parameterization == Parameterization.Eps ? noise : schedule.Velocity(z0, t, noise);
        var loss = nn.functional.mse_loss(target, output, nn.Reduction.None).mean();
        return (loss, t, xNoisy, output, target);
    }

    /// <summary>
    /// One training step of the ControlNet on latents computed beforehand: <paramref name="z0"/> (the scaled posterior
    /// sample of the HQ image), <paramref name="cImg"/> (the condition latent of the stage-1 output) and
    /// <paramref name="cTxt"/>. The same <c>p_losses</c>, backward and optimizer step as <see cref="Step"/>, which computes
    /// these three with the frozen VAE, stage 1 and CLIP at every step; with frozen networks and no noise augmentation
    /// they can be computed once per image (the tiny recipe does). Returns the loss (detached).
    /// </summary>
    public static Tensor StepOnLatents(ControlLDM cldm, NoiseSchedule schedule, Tensor z0, Tensor cImg, Tensor cTxt, optim.Optimizer optimizer,
        ITrainingDraws draws)
    {
        if (z0.dim() != 4 || cImg.dim() != 4 || z0.shape[0] != cImg.shape[0] || cTxt.shape[0] != z0.shape[0])
            throw new ArgumentException($"stage-2 latents: z0 [{string.Join(",", z0.shape)}], c_img [{string.Join(",", cImg.shape)}] and c_txt [{string.Join(",", cTxt.shape)}] must be batches of the same size");
        using var scope = NewDisposeScope();
        var (loss, _, _, _, _) = PLosses(cldm, schedule, z0, cTxt, cImg, draws);
        optimizer.zero_grad();
        loss.backward();
        optimizer.step();
        return loss.detach().MoveToOuterDisposeScope();
    }
}
