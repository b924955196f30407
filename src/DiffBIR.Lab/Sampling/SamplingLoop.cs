using DiffBIR.Lab.Diffusion;
using DiffBIR.Lab.Guidance;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Sampling;

/// <summary>
/// What an observer sees after each sampler step's main model evaluation: the step, the model timestep t, z_t, x̂₀
/// (after guidance where it was applied), the guidance loss and the norm of its latent gradient Δ.
/// </summary>
/// <remarks>The loop runs each step in a TorchSharp DisposeScope: these tensors, and any an observer makes, are freed
/// when the step ends. Call <c>DetachFromDisposeScope()</c> on a tensor to keep it past the step.</remarks>
public sealed record StepInfo(int Step, int Timestep, Tensor Zt, Tensor PredictedX0, bool GuidanceApplied, double? GuidanceLoss, double? GradientNorm)
{
    /// <summary>The combined (CFG) model output of the step (ε for the spaced sampler).</summary>
    public Tensor? Output { get; init; }
    /// <summary>x̂₀ as the network predicted it, before guidance.</summary>
    public Tensor? ModelX0 { get; init; }
    /// <summary>Latent → image, when the loop was given one (see <see cref="DecodePredictedX0"/>).</summary>
    public Func<Tensor, Tensor>? Decoder { get; init; }

    /// <summary>x̂₀ decoded to an image (costs one VAE decode; only on request). Needs a decoder given to the loop.</summary>
    public Tensor DecodePredictedX0()
    {
        if (Decoder is null) throw new InvalidOperationException("no decoder was given to the sampling loop: pass one to decode x̂₀ for the observer");
        using var _ = torch.no_grad();
        return Decoder(PredictedX0);
    }
}

/// <summary>
/// The sample-step / guide loop, as a reusable driver built from the stages a notebook uses itself
/// (<see cref="Stages.SampleStep"/>): for each step the CFG model output and x̂₀ (Predict), optional guidance of x̂₀
/// (the first evaluation of each step only), the observer, then the sampler update (Step). Every step runs in its
/// own dispose scope. The observer returns false to cancel: <see cref="Run"/> then returns null.
/// </summary>
public static class SamplingLoop
{
    public static Tensor? Run(SamplerRun run, CfgDenoiser model, Guide? guide = null, Func<StepInfo, bool>? observer = null,
                              Func<Tensor, Tensor>? decoder = null) =>
        // the same parts a notebook uses (Stages.SampleStep: Predict, guide, observer, Step)
        new Stages.SampleStep(run.Sampler, model).Run(Stages.SamplingState.Of(run), guide, observer, decoder);

    /// <summary>The whole official <c>sampler.sample(...)</c>: make the sampler from its name, run it from x_T.</summary>
    public static Tensor Sample(string samplerType, NoiseSchedule schedule, SamplerOptions options, CfgDenoiser model,
                                Tensor xT, int steps, INoiseSource noise, Guide? guide = null, Func<StepInfo, bool>? observer = null)
    {
        using var run = Samplers.Create(samplerType, schedule, options).Start(xT, steps, noise);
        return Run(run, model, guide, observer) ?? throw new OperationCanceledException("sampling cancelled by the observer");
    }
}
