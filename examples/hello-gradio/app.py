import gradio as gr


def greet(name: str) -> str:
    return f"Hello, {name or 'world'}!"


demo = gr.Interface(fn=greet, inputs="text", outputs="text", title="Hello from the appliance")

if __name__ == "__main__":
    demo.launch()
