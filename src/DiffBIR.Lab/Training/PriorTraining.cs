using DiffBIR.Lab.Checkpoints;
using DiffBIR.Lab.Diffusion;
using DiffBIR.Lab.Models;
using DiffBIR.Lab.Models.StableDiffusion;
using DiffBIR.Lab.Pipeline;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Training;

/// <summary>
/// <c>train prior</c>: the UNet as a latent diffusion prior (the LDM recipe of Stable Diffusion, as
/// <see cref="PriorTrainer"/>): z₀ = VAE posterior sample of gt × the latent scale, t ~ U[0, T), x_t = q_sample(z₀, t, ε),
/// target ε (v2) or v (v2.1), loss = mean((target − UNet(x_t, t, CLIP(prompt)))²). The VAE and CLIP are frozen; only
/// the UNet learns. Tiny: the fixture-sized networks with seeded random init; full size: from an SD 2.1 checkpoint.
/// </summary>
public sealed class PriorTraining : ITrainer
{
    readonly ControlLDM _cldm;
    readonly NoiseSchedule _schedule;
    public string Stage => "prior";
    public nn.Module Trainable => _cldm.unet;
    public optim.Optimizer Optimizer { get; }
    public IReadOnlyDictionary<string, string> CheckpointMetadata { get; }
    public bool WritesSamples => false;

    public PriorTraining(TrainOptions o)
    {
        _schedule = o.Schedule == "v2.1" ? NoiseSchedule.V2_1 : NoiseSchedule.V2;
        if (o.Tiny || o.RandomInit)
        {
            _cldm = Trainers.RandomCldm(o, ControlMode.Add, 4);
        }
        else
        {
            _cldm = Trainers.FullSizeCldm(o, ControlMode.Add);
            using var sd = Checkpoint.Load(o.Sd!);
            var (_, missing) = _cldm.LoadPretrainedSd(sd.Tensors, o.Sd!);
            var sdMissing = missing.Where(k => !k.StartsWith("controlnet", StringComparison.Ordinal)).ToList();
            if (sdMissing.Count > 0)
                throw new CheckpointException(o.Sd!, $"not a Stable Diffusion 2.1 checkpoint for this model: {sdMissing.Count} keys are missing ({string.Join(", ", sdMissing.Take(3))}…)");
        }
        foreach (var m in new nn.Module[] { _cldm.vae, _cldm.clip, _cldm.controlnet })
        {
            m.eval();
            foreach (var p in m.parameters()) p.requires_grad = false;
        }
        _cldm.unet.train();
        foreach (var p in _cldm.unet.parameters()) p.requires_grad = true;
        _cldm.to(Trainers.DeviceOf(o));
        Optimizer = optim.AdamW(_cldm.unet.parameters(), o.LearningRate, 0.9, 0.999, 1e-8, weight_decay: o.WeightDecay);
        CheckpointMetadata = new Dictionary<string, string>
        {
            ["stage"] = "prior",
            ["schedule"] = o.Schedule,
            ["network"] = o.Tiny ? "unet-tiny" : o.RandomInit ? "unet (random SD: timing only)" : "unet",
        };
    }

    public Tensor Loss(TrainingBatch batch, ITrainingDraws draws)
    {
        var device = _cldm.unet.parameters().First().device;
        var gt = batch.Gt.to(device).permute(0, 3, 1, 2).contiguous().to(ScalarType.Float32);
        long b = gt.shape[0];
        Tensor z0, ctx;
        using (no_grad())
        {
            using var posterior = _cldm.vae.Encode(gt);
            var eps0 = draws.Randn(posterior.Mean.shape, posterior.Mean.dtype, device, "posterior_noise(vae_encode(gt).sample())");
            z0 = posterior.Sample(eps0) * _cldm.Config.LatentScaleFactor;
            ctx = _cldm.clip.Encode(batch.Prompts);
        }
        var t = draws.RandInt(_schedule.Timesteps, new[] { b }, device, "t");
        var noise = draws.Randn(z0.shape, ScalarType.Float32, device, "p_losses_noise");
        var xt = _schedule.QSample(z0, t, noise);
        var output = _cldm.unet.forward(xt, t, ctx);
        var target = _schedule.Parameterization == Parameterization.Eps ? noise : _schedule.Velocity(z0, t, noise);
        return nn.functional.mse_loss(output, target);
    }

    public Tensor Restore(Tensor lqNchw, long seed) =>
        throw new NotSupportedException("a prior restores nothing: validation and samples are for stage1 and stage2");

    public void Dispose() => _cldm.Dispose();
}
