"""Where retrieval applications are built: LangChain, LlamaIndex, LanceDB and Chroma on q3vl.

Each module is a thin layer that maps its framework's objects to q3vl items and embeds or scores
them with a bundle in this process or with a `q3vl serve` URL (`q3vl.integrations.models`, whose
remote mode is `q3vl.integrations.client`). One pip extra per framework, so a LangChain user does
not install a vector database:

    q3vl.integrations.langchain     Q3VLEmbeddings, Q3VLRerank          pip install 'q3vl[langchain]'
    q3vl.integrations.llama_index   Q3VLMultiModalEmbedding, Q3VLRerank pip install 'q3vl[llamaindex]'
    q3vl.integrations.lancedb       Q3VLEmbeddingFunction ("q3vl")      pip install 'q3vl[lancedb]'
    q3vl.integrations.chroma        Q3VLEmbeddingFunction, Q3VLLoader   pip install 'q3vl[chroma]'

Importing this package imports no framework; importing one of the modules without its extra raises
one line naming the extra.
"""
