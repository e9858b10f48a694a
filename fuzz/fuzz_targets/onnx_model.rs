#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    stride_train::fuzzing::onnx_model(data);
});
